import lightning.pytorch as pl
from torch.utils.data import DataLoader

from wanda_lightning import AfterStep, CausalLMModule, Distillation, WandaShrinkCallback
from wanda_lightning.data.corpus import split_tokens
from wanda_lightning.data.smollm2 import load_smollm2

model, tokenizer = load_smollm2()
splits = split_tokens(tokenizer, num_samples=64, seqlen=256, max_eval_windows=8)
train = DataLoader([{"input_ids": ids} for ids in splits.calibration], batch_size=4, shuffle=True)
val = DataLoader([{"input_ids": ids} for ids in splits.heldout], batch_size=4)

shrinking = WandaShrinkCallback(  # fine-tune 8 steps, remove 6 of the 30 blocks, recover by distillation
    layers=0.2, layer_score="angular", prune_on=AfterStep(8), distill=Distillation(learning_rate=5e-4)
)
trainer = pl.Trainer(max_steps=24, callbacks=[shrinking], logger=False, enable_checkpointing=False)
trainer.fit(CausalLMModule(model, learning_rate=5e-5), train, val)
model.save_pretrained("smollm2-shrunk")  # a plain transformers folder: AutoModelForCausalLM.from_pretrained loads it
