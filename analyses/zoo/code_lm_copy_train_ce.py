"""Re-measure code-lm-copy-sparse's card ``train_ce`` on the rows its base's ``base_train_ce`` was measured on.

The run's card measured it on plain train rows while the base's came from the constraint rows (half repeat windows,
``TextCorpus.constraint_rows``); circuitkit/sparsity/finetune.py now measures both on the same rows. This writes the
corrected value (and the plain-row one as ``train_ce_plain``) into the card of each folder given, and prints the base's
CE on the same plain rows beside them.

    python analyses/zoo/code_lm_copy_train_ce.py circuitkit/zoo/code-lm-copy-sparse models/code-lm-copy-sparse
"""

import sys

from circuitkit.corpus import TextCorpus
from circuitkit.io import read_json, write_json
from circuitkit.sparsity import load_model
from circuitkit.training import corpus_ce

for folder in sys.argv[1:]:
    card = read_json(f"{folder}/card.json")
    fc = card["finetune_config"]
    model = load_model(folder)
    c = TextCorpus.from_source(fc["corpus"], model.tokenizer, seq_len=fc["corpus_seq_len"],
                               heldout_fraction=fc["corpus_heldout_fraction"], seed=fc["corpus_seed"])
    c = c.with_repeats(fc["corpus_repeat_fraction"], fc["corpus_repeat_min"])
    card["train_ce_plain"] = corpus_ce(model, c.rows("train", fc["target_n"]))
    card["train_ce"] = corpus_ce(model, c.constraint_rows(fc["target_n"]))
    write_json(f"{folder}/card.json", card)
    base_plain = corpus_ce(load_model(card["base_model"]), c.rows("train", fc["target_n"]))  # the base, same plain rows
    print(folder, {k: round(card[k], 4) for k in ("base_train_ce", "train_ce", "train_ce_plain", "target_ce")},
          {"base_train_ce_plain": round(base_plain, 4)})
