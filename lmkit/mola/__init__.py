"""MoLA (Zhou et al., ICML 2024, "Mixture of Low-rank Adapters", MediaBrain-SJTU/MoLA) for causal LMs.

Not to be confused with the layer-wise MoE-LoRA method also called MoLA (Gao et al., 2025).
"""
