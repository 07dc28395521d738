"""Chat with a model in the terminal: `python recipes/chat.py MODEL [--key value ...]`, e.g.
`python recipes/chat.py outputs/qrpo-tiny --temperature 0` (the same as `python -m apertus_hf.chat MODEL ...`).

MODEL is a saved model folder or a Hub id; answers stream as they are generated, with the model's chat template and
Apertus' recommended sampling (temperature 0.8, top-p 0.9). In the chat: /reset, /system TEXT, /think on|off, /help,
/quit (or Ctrl-D); Ctrl-C stops an answer. With `--prompts FILE` (.txt, one prompt per line, or .jsonl of
{"prompt"} / {"messages"} rows) it answers each prompt as its own conversation and writes JSONL instead. Every option
is a field of `apertus_hf.chat.ChatConfig`; `--help` lists them. See docs/chat.md.
"""

from apertus_hf.chat import main

if __name__ == "__main__":
    main()
