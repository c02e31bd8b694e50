"""Training-free token pruning (freePruner-style) for LLaVA-family models and long text prompts."""
