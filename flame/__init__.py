"""flame: train flash-linear-attention language models from a text corpus.

flame data prepare --dataset HuggingFaceFW/fineweb-edu --name sample-10BT --split train
flame train --model configs/gla_340M.json --cache data/HuggingFaceFW/fineweb-edu/sample-10BT/train
"""

__version__ = "0.1.0"
