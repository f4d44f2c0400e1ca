"""Dead/alive bookkeeping that is correct for signed codes.

A latent fired on a token if its code is non-zero there (negative codes count: TopK by magnitude
keeps the sign). It is alive if it fired at least once within the last ``window_tokens`` tokens.
"""

import torch


def fired_mask(f_BF: torch.Tensor) -> torch.Tensor:
    """(F,) bool: latents whose code is non-zero on at least one row of ``f_BF`` (the one definition of
    "fired" for every alive count in the project)."""
    return (f_BF != 0).reshape(-1, f_BF.shape[-1]).any(dim=0)


class LatentActivityTracker:
    def __init__(self, dict_size: int, window_tokens: int, device: torch.device | str = "cpu"):
        self.window_tokens = window_tokens
        # Starts at 0 like dictionary_learning, so auxK does not treat every latent as dead at step 0.
        self.tokens_since_fired = torch.zeros(dict_size, dtype=torch.long, device=device)
        self.ever_fired = torch.zeros(dict_size, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, fired_F: torch.Tensor, num_tokens: int) -> None:
        """Record one batch; ``fired_F`` is a bool mask of latents non-zero on any of its tokens."""
        self.tokens_since_fired += num_tokens
        self.tokens_since_fired[fired_F] = 0
        self.ever_fired |= fired_F

    @torch.no_grad()
    def update_from_codes(self, f_BF) -> None:
        """``f_BF`` is a dense (B, F) code tensor or a k-sparse ``TopKCodes`` (idx_BK, vals_BK)."""
        if isinstance(f_BF, torch.Tensor):
            self.update(fired_mask(f_BF), f_BF.shape[0])
        else:
            self.update_from_topk(f_BF.idx_BK, f_BF.vals_BK, f_BF.dict_size)

    @torch.no_grad()
    def update_from_topk(self, idx_BK: torch.Tensor, vals_BK: torch.Tensor, num_latents: int) -> None:
        """Same as ``update_from_codes`` on the scattered codes, from the (B, k) selection alone.
        A selected latent whose value is exactly 0 did not fire (e.g. ReLU zeros ranked into the top-k)."""
        # A count per latent (no boolean-mask compaction, whose output size needs a sync).
        fires_F = torch.zeros(num_latents, dtype=torch.int32, device=idx_BK.device)
        fires_F.index_put_((idx_BK.reshape(-1),), (vals_BK != 0).reshape(-1).to(torch.int32), accumulate=True)
        self.update(fires_F > 0, idx_BK.shape[0])

    def dead_mask(self) -> torch.Tensor:
        """Latents silent for a whole window (the auxK target set)."""
        return self.tokens_since_fired >= self.window_tokens

    def alive_mask(self) -> torch.Tensor:
        return self.ever_fired & ~self.dead_mask()

    def frac_alive(self) -> float:
        return self.alive_mask().float().mean().item()

    def state_dict(self) -> dict:
        return {"tokens_since_fired": self.tokens_since_fired.clone(), "ever_fired": self.ever_fired.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.ever_fired.copy_(state["ever_fired"])
