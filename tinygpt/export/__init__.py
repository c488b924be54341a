"""Exporters: tinygpt checkpoints in the formats other tools read.

    hf.py       a Hugging Face model directory (``LlamaForCausalLM`` / ``GPT2LMHeadModel``, the
                tokenizer with its chat template, the generation config; a LoRA run's adapter
                in peft's format for the exported base)
    gguf.py     one GGUF file for llama.cpp (f32, f16 or q8_0), written with the ``gguf`` package
    lmeval.py   an lm-evaluation-harness task for the world's held-out Task 1 split
    data.py     the world's and the ranker's files in TRL's conversational schemas

Each module is a command (``tinygpt export hf|gguf|lm-eval|data``) and a Python function. They read
checkpoints and files on disk and import the libraries of the format they write only when called.
They know nothing about training.
"""
