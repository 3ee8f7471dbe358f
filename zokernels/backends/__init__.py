"""Three implementations of one semantics: torch (reference), cpu (C++), triton."""
