"""Small LLMs: a GGUF file or a Hugging Face folder becomes onnxruntime-genai candidates
(int4, int4 asymmetric block 32, int8, fp16), each measured against the float model and gated
on a profile's [llm] budgets; the chosen one is packed as a text-generation artifact.

config (the build config), convert (GGUF -> HF folder -> genai folders), quality (agreement and
perplexity against the float model), probe (speed and memory in a fresh process), build (the
per-profile search and packing).
"""
