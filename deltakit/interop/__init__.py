"""Interoperability with other tools' formats (PEFT LoRA adapters)."""
