"""tinygpt: the whole ChatGPT recipe at laptop scale, in readable PyTorch."""

__version__ = "0.1.0"
