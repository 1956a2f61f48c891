"""Data: from raw text to packed training batches.

A prepared dataset (what `flame data prepare` writes, what `flame train --cache` reads) is a folder:

    DIR/
      dataset_dict.json, train/, validation/   `datasets.DatasetDict.save_to_disk`; `datasets.load_from_disk(DIR)`
                                               opens it. One row per document, column `input_ids` (int32 token ids,
                                               the document whole, EOS appended). `validation` may be absent.
      tokenizer/                               the tokenizer that made it (`AutoTokenizer.from_pretrained` loads it)
      manifest.json                            see MANIFEST_FIELDS

Packing into context windows happens in the training loader, so one prepared dataset serves any context length.
"""

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TOKENS_COLUMN = "input_ids"
FORMAT = "flame.prepared/1"

# manifest.json, one JSON object:
#   format          FORMAT
#   source          {"kind": "hub"|"local", "dataset": str, "name": str|null, "split": str, "files": [...]|null,
#                    "column": str, "streaming": bool}
#   tokenizer       {"name_or_path": str, "vocab_size": int (len(tokenizer)), "eos_token_id": int,
#                    "bos_token_id": int|null}
#   splits          {"train": {"documents": int, "tokens": int}, "validation": {...}}   tokens include the EOS
#   context_length  int, the default training context (--context_length)
#   settings        every option that made it (val_docs, seed, num_proc, ...)
#   created         ISO time, flame_version
MANIFEST_FIELDS = ("format", "source", "tokenizer", "splits", "context_length", "settings", "created", "flame_version")
