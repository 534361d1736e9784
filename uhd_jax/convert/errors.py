"""The one error the converter raises: every problem found, listed by name, raised at once."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint that cannot be converted. `problems` lists each one, naming the tensor, parameter or key."""

    def __init__(self, problems: list[str], context: str = ""):
        self.problems = list(problems)
        head = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        head += f" converting {context}" if context else ""
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


def raise_if(problems: list[str], context: str = ""):
    if problems:
        raise ConversionError(problems, context)
