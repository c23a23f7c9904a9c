"""Training: LLaVA-format data, the synthetic shapes data set for the demo model, and its tokenizer.

Submodules are imported explicitly (``from fastllava.train.synthetic_data import generate_dataset``); this
package module imports nothing so that importing one piece never pulls in torch or the others.
"""
