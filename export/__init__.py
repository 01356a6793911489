"""edgelm's build side (installs as ``edgelm_export``; needs the [export] extra: torch, transformers, onnx).

``edgelm_export.convert.export_model`` turns a Hugging Face causal LM into an edgelm model folder.
Nothing here is imported by the runtime (``import edgelm``).
"""
