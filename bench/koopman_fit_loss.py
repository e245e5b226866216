"""The authors' SVD fit loss (METHODS.md 3a) vs latentx's former one, on the same W and the same batch.

Former (latentx <= the estimator): J = ||Psi_Y V - Psi_X V S||_F / B with V = Vh^T detached.
Authors' (``fit_loss="svd"`` now): J = ||Psi_Y Vh - Psi_X Vh S||_F / B, Vh as torch.linalg.svd returns it,
gradient through the SVD.  Data: hidden states of the built-in tiny model's sampled responses (64 of them),
the authors' layout (first 512 positions, zero-padded), their init (kaiming_uniform(a=sqrt(7)), seed 42).

    PYTHONPATH=src python bench/koopman_fit_loss.py
"""

from __future__ import annotations

import torch

from latentx.dynamics import AUTHORS_SEED, KoopmanDictionary, authors_settings
from latentx.models import load_model


def former_objective(d: KoopmanDictionary, X: torch.Tensor, lengths: torch.Tensor, ridge: float) -> torch.Tensor:
    psi = d.lift(X)
    pairs = torch.arange(1, X.shape[1])[None, :] < lengths[:, None]
    px, py = psi[:, :-1][pairs].double(), psi[:, 1:][pairs].double()
    eye = torch.eye(px.shape[1], dtype=torch.float64)
    K = torch.linalg.solve(px.T @ px + ridge * eye, px.T @ py)
    _, S, Vh = torch.linalg.svd(K)
    V = Vh.mT.detach()
    return torch.linalg.matrix_norm(py @ V - (px @ V) * S) / X.shape[0]


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_model("tiny", seed=0)
    prompts = tok(["12 + 7 =", "3 * 4 =", "9 - 5 =", "21 + 30 ="], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**prompts, do_sample=True, max_new_tokens=96, num_return_sequences=16,
                             pad_token_id=tok.pad_token_id)
        hidden = model(out, output_hidden_states=True).hidden_states[-1]
    start = prompts["input_ids"].shape[1]
    H = hidden[:, start - 1 : -1].float()
    mask = torch.ones(H.shape[:2], dtype=torch.bool)
    d = KoopmanDictionary(H.shape[-1], m=50, seed=AUTHORS_SEED, **authors_settings(512))
    X, lengths = d._fit_data(H, mask, "bench")
    new = d.fit_objective(H, mask)
    new.backward()
    g_new = d.weight.grad.clone()
    d.weight.grad = None
    old = former_objective(d, X, lengths, 1e-3)
    old.backward()
    g_old = d.weight.grad.clone()
    cos = torch.nn.functional.cosine_similarity(g_new.flatten(), g_old.flatten(), dim=0)
    print(f"trajectories {H.shape[0]}, hidden {H.shape[-1]}, window 512 (zero-padded), m 50, seed {AUTHORS_SEED}")
    print(f"authors' svd loss   {new.item():.4f}")
    print(f"former svd loss     {old.item():.4f}")
    print(f"gradient cosine     {cos.item():.4f}   norms {g_new.norm():.4g} vs {g_old.norm():.4g}")


if __name__ == "__main__":
    main()
