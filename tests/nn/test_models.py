import pytest
import torch

from effattn.models import TinyLM


@pytest.mark.parametrize("method", ["standard", "mamba2"])
def test_tinylm_generate_matches_full_recompute(method):
    """generate() decodes through the layers' caches; greedy tokens must equal argmax of a full forward."""
    torch.manual_seed(0)
    model = TinyLM(37, 16, 2, method, heads=2).double().eval()
    prompt = torch.randint(0, 37, (2, 5))
    out = model.generate(prompt, 6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        for t in range(5, 11):
            assert torch.equal(model(out[:, :t])[:, -1].argmax(-1), out[:, t])
    sampled = model.generate(prompt, 3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 8) and int(sampled.max()) < 37


def test_tinylm_shapes_state_size_and_errors():
    model = TinyLM(11, 16, 2, "standard", heads=2)
    assert model(torch.randint(0, 11, (3, 4))).shape == (3, 4, 11)
    assert model.embed.weight is model.embed.weight  # tied: logits use the embedding matrix
    tokens = torch.zeros(1, 9, dtype=torch.long)
    assert model.cache_elements(tokens) == 2 * 2 * 9 * 16  # layers x (K, V) x T x heads * head_dim
    gla = TinyLM(11, 16, 2, "gla", heads=2)
    assert gla.cache_elements(tokens) == gla.cache_elements(torch.zeros(1, 3, dtype=torch.long))  # fixed state
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 11\)"):
        model(torch.tensor([[0, 11]]))
    with pytest.raises(ValueError, match=r"tokens must have 2 dimensions"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="tokens must have dtype"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(tokens, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="did you mean"):
        TinyLM(11, 16, 2, "glaa")
