"""Visual-computation savings in the LLM (the YOPO paper, arXiv 2410.06169): FLOPs of the four cuts (`flops`)."""
