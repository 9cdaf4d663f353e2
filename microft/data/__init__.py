"""Training data, from a file on disk to the token ids of a micro-batch.

formats.py      record files, one reader per format (`FORMATS`: JSON, JSONL, CSV, TSV, Parquet)
hubdata.py      dataset repos from the Hugging Face hub cache (`--data ORG/NAME`)
instruct.py     instruction and chat records: read, validate, render, mask, split
preference.py   preference pairs (chosen and rejected responses to one prompt) for `microft dpo`
templates.py    prompt templates: how a record becomes text and which part of it is trained on
chat.py         a model's own jinja chat template
tokenizer.py    one interface over GPT-2's vendored BPE, `tokenizer.json` and tiktoken files
tokenizer_files.py  a model's tokenizer: found beside its weights, copied into what a run or export writes
batches.py      text packing, the step sampler, micro-batch splitting and collation
demo.py         the built-in demo dataset, its tokenizer and model
"""
