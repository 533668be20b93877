"""Adapters that run third-party DeepSeek-V4 model code on v4kernels ops.

* :mod:`v4kernels.integrations.transformers` — Hugging Face transformers' ``deepseek_v4`` model
  (``apply(model)`` / ``remove(model)``; transformers is imported only when used).
"""
