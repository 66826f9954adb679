"""One module per adapter file format, each reading and writing it.

* ``kohya``: Kohya / LyCORIS safetensors files (every algorithm), with ``ss_*`` / modelspec metadata;
* ``peft``: PEFT adapter folders (LoRA, LoHa, LoKr);
* ``diffusers``: diffusers' own LoRA files;
* ``in_memory``: what the writers share, the modules of an in-memory adapter and their LoRA forms.
"""
