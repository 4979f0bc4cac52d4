"""Writes tests/fixtures/bert_tiny/: a small random Hugging Face BERT and its outputs.

Run by a developer with torch and transformers installed (not by CI, which only reads the files):

  python tools/make_bert_fixture.py            # with a Python that has torch and transformers

It builds `transformers.BertModel` (2 layers, hidden 32, 4 heads, vocabulary 128, intermediate
37, 64 positions, with its pooler), draws its weights from wider distributions than BERT's
N(0, 0.02) (so attention is far from uniform and a wrong mask, scale or LayerNorm shows in the
outputs), saves it with `save_pretrained` (config.json + model.safetensors, the layout of a
published checkpoint) and writes `outputs.npz` beside it:

  text_bert_a (4, 3, 16), text_bert_b (2, 3, 64): float32 MMSA rows [ids, mask, segment ids],
    with padding (mask 0) and a sentence pair (segment ids 1) in batch a; batch b fills every
    position of the position table;
  last_hidden_state_{a,b}, pooler_output_{a,b}: the model's outputs in eval mode (eager
    attention; SDPA is checked to agree);
  num_parameters: BertModel's parameter count, pooler included; versions: provenance.

tests/test_bert.py loads the folder with dhmd_jax's loader and compares.
"""

import json
import os
import sys

import numpy as np
import torch
import transformers

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                   "fixtures", "bert_tiny")
CONFIG = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
              hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
              layer_norm_eps=1e-12, pad_token_id=0)


def text_bert(rng, lengths, t, pair_at=None):
  """(B, 3, T) float32 rows as MMSA stores them: [CLS] words [SEP], zero padding."""
  b = len(lengths)
  out = np.zeros((b, 3, t), np.float32)
  for i, n in enumerate(lengths):
    ids = rng.integers(1, CONFIG["vocab_size"], size=n)
    ids[0], ids[-1] = 101, 102  # [CLS] ... [SEP], bert-base-uncased's ids
    out[i, 0, :n] = ids
    out[i, 1, :n] = 1
    if pair_at is not None and i in pair_at:
      out[i, 2, pair_at[i]:n] = 1  # second sentence of a pair
  return out


def run(model, rows):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(rows[:, 0]).long(),
                attention_mask=torch.from_numpy(rows[:, 1]).float(),
                token_type_ids=torch.from_numpy(rows[:, 2]).long())
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def main():
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  config = transformers.BertConfig(**CONFIG, attn_implementation="eager")
  model = transformers.BertModel(config, add_pooling_layer=True)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm.weight" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias") or "LayerNorm" in name:
        p.copy_(0.1 * torch.randn_like(p))
      elif "embeddings" in name:
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  model.eval()

  rows_a = text_bert(rng, [16, 11, 5, 2], 16, pair_at={1: 6})
  rows_b = text_bert(rng, [64, 40], 64, pair_at={0: 30})
  hidden_a, pooled_a = run(model, rows_a)
  hidden_b, pooled_b = run(model, rows_b)
  model.set_attn_implementation("sdpa")
  np.testing.assert_allclose(run(model, rows_a)[0], hidden_a, atol=1e-5)  # SDPA agrees
  model.set_attn_implementation("eager")

  os.makedirs(OUT, exist_ok=True)
  model.save_pretrained(OUT, safe_serialization=True)
  np.savez(os.path.join(OUT, "outputs.npz"),
           text_bert_a=rows_a, last_hidden_state_a=hidden_a, pooler_output_a=pooled_a,
           text_bert_b=rows_b, last_hidden_state_b=hidden_b, pooler_output_b=pooled_b,
           num_parameters=np.int64(model.num_parameters()),
           versions=np.array(json.dumps({"torch": torch.__version__,
                                         "transformers": transformers.__version__,
                                         "python": sys.version.split()[0]})))
  for name in sorted(os.listdir(OUT)):
    print(f"{os.path.join(OUT, name)}: {os.path.getsize(os.path.join(OUT, name)):,} bytes")
  print(f"BertModel parameters (pooler included): {model.num_parameters():,}")


if __name__ == "__main__":
  main()
