"""The ``Modelfile`` written beside a GGUF file, so that ``ollama create NAME -f Modelfile`` imports it.

It always holds ``FROM ./<file>.gguf`` (Ollama does not re-quantize an imported GGUF). For the two chat formats
recognised in the file's chat template it adds Ollama's prompt template and the turn-ending stop token: ChatML
(``<|im_start|>``: SmolLM2, Qwen2) and Gemma (``<start_of_turn>``). Any other template is left to Ollama, which
reads ``tokenizer.chat_template`` from the GGUF file itself.
"""

from __future__ import annotations

__all__ = ["MODELFILE", "modelfile_text"]

#: The name of the file written beside the GGUF file.
MODELFILE = "Modelfile"

_CHATML = '''TEMPLATE """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
"""
PARAMETER stop "<|im_start|>"
PARAMETER stop "<|im_end|>"
'''

_GEMMA = '''TEMPLATE """<start_of_turn>user
{{ if .System }}{{ .System }}

{{ end }}{{ .Prompt }}<end_of_turn>
<start_of_turn>model
{{ .Response }}<end_of_turn>
"""
PARAMETER stop "<end_of_turn>"
'''


def modelfile_text(gguf_name: str, chat_template: str | None) -> str:
    """The Modelfile for the GGUF file ``gguf_name`` (in the same folder) with this chat template.

    Example::

        >>> print(modelfile_text("small.gguf", None))
        FROM ./small.gguf
        <BLANKLINE>
        >>> chatml = "{{ '<|im_start|>' + message['role'] }}{{ message['content'] + '<|im_end|>' }}"
        >>> modelfile_text("small.gguf", chatml).splitlines()[-1]
        'PARAMETER stop "<|im_end|>"'
    """
    text = f"FROM ./{gguf_name}\n"
    if chat_template and "<|im_start|>" in chat_template and "<|im_end|>" in chat_template:
        text += _CHATML
    elif chat_template and "<start_of_turn>" in chat_template and "<end_of_turn>" in chat_template:
        text += _GEMMA
    return text
