"""Quantization: specs, fake-quant modules, conversion to integer codes, bit packing, exporters.

The trainer imports this package only when a config has a ``quant`` section.
"""
