"""Language models and text: the embedded default model (``models``, ``assets``, ``default_lm``, which
trains it), the text sources activation buffers read (``corpus``), and the default model's registration
with the SAEBench adapters (``registration``)."""
