"""Reprogramming distillation (RD): a frozen teacher, a reprogramming module, a shared classifier and CKA."""
