import dictionary_learning.utils
from dictionary_learning import ActivationBuffer
from dictionary_learning.training import trainSAE

# Importing the registry adds vsae, vsae_topk, mp_sae next to dictionary_learning's trainers and
# extends dictionary_learning.utils.load_dictionary to load them.
from dictionary_learning_ext import ARCHITECTURES
from experiments.lm.corpus import local_corpus
from experiments.lm.models import load_model

# The embedded 2-layer model (offline): lm.model is an nnsight LanguageModel, lm.submodule the block
# whose output is the residual stream after layer 0. On a GPU box: load_model("gelu-1l", layer=0).
lm = load_model("default", layer=0)
buffer = ActivationBuffer(
    local_corpus(),  # an iterator of strings; dictionary_learning's hf_dataset_to_generator(...) works too
    lm.model,
    lm.submodule,
    d_submodule=lm.d_model,
    n_ctxs=256,
    ctx_len=64,
    refresh_batch_size=128,
    out_batch_size=256,
    device="cpu",
)

steps = 200
cfg = ARCHITECTURES["vsae_topk"].trainer_config(  # or ARCHITECTURES["vsae_topk"].trainer_config("paper", ...)
    steps=steps,
    activation_dim=lm.d_model,
    dict_size=4 * lm.d_model,
    k=32,
    layer=lm.layer,
    lm_name=lm.name,
    lr=8e-4,
    seed=0,
    device="cpu",
)
trainSAE(buffer, [cfg], steps=steps, save_dir="runs/own_script", device="cpu")

# dictionary_learning's own loader, as evaluation code written for dictionary_learning calls it
ae, config = dictionary_learning.utils.load_dictionary("runs/own_script/trainer_0", device="cpu")
x = next(buffer)
with __import__("torch").no_grad():
    fve = 1 - (x - ae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
print(f"{type(ae).__name__}: k={config['trainer']['k']}, dict_size={ae.dict_size}, FVE on a fresh batch {fve:.3f}")
