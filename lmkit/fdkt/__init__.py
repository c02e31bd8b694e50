"""Federated domain knowledge transfer (FDKT): DP synthetic demonstrations from clients, server-LLM
augmentation, client small-model training. Plain functions here; Flower orchestration in
`lmkit.fdkt.flower_app` (needs the `federated` extra)."""
