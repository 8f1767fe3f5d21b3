import lightning.pytorch as pl
from torch.utils.data import DataLoader

from wanda_lightning import AfterStep, CausalLMModule, WandaPruningCallback
from wanda_lightning.data.corpus import split_tokens
from wanda_lightning.data.smollm2 import load_smollm2

model, tokenizer = load_smollm2()
splits = split_tokens(tokenizer, num_samples=64, seqlen=256, max_eval_windows=8)
train = DataLoader([{"input_ids": ids} for ids in splits.calibration], batch_size=4, shuffle=True)
val = DataLoader([{"input_ids": ids} for ids in splits.heldout], batch_size=4)

pruning = WandaPruningCallback(sparsity=0.5, prune_on=AfterStep(8))  # fine-tune 8 steps, prune, train on sparse
trainer = pl.Trainer(max_steps=16, callbacks=[pruning], logger=False, enable_checkpointing=False)
trainer.fit(CausalLMModule(model, learning_rate=5e-5), train, val)
print(pruning.metrics["val_ppl"])  # {'dense': ..., 'pruned': ..., 'delta': ...}
