"""The auto-regressive teacher bundle (issue 9 item 1, issue 16): a tiny random transformers causal LM (GPT-2 and
Llama configs) + a tiny diffusers VQModel, built from config as diffusers' own tests do."""
import json

import pytest
import torch

from onestep.teachers_ar import AutoregressiveTeacher

K, C, GRID = 16, 3, (4, 4)          # 16 codes, 3 classes, 4x4 tokens (8x8 images, one 2x downsampling)
VOCAB = K + C + 1


def tiny_vq(seed=0):
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                   latent_channels=4, num_vq_embeddings=K, norm_num_groups=4, sample_size=8)


def tiny_lm(kind, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    special = dict(bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=24, n_embd=32, n_layer=2, n_head=4, **special))
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24,
                                        **special))


@pytest.fixture(params=["gpt2", "llama"])
def teacher(request):
    return AutoregressiveTeacher(tiny_lm(request.param), tiny_vq(), C, GRID).eval()


LABELS = torch.tensor([0, 1, 2, 1, 0, 2])


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_teacher_forcing_equals_kv_cache_decoding(teacher, scale):
    tokens, step_logits = teacher.sample(LABELS, torch.Generator().manual_seed(0), guidance_scale=scale,
                                         return_logits=True)
    assert tokens.shape == (6, 16) and step_logits.shape == (6, 16, K)
    with torch.no_grad():
        forced = teacher.logits(tokens, LABELS, guidance_scale=scale)
    torch.testing.assert_close(forced, step_logits, rtol=0, atol=1e-5)
    assert forced[:, 1:].std(dim=0).mean() > 1e-3  # positions really depend on the sampled prefix


def test_sampling_is_reproducible_and_top_k_1_is_greedy(teacher):
    draw = lambda seed, **kw: teacher.sample(LABELS, torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    greedy = draw(0, top_k=1)
    assert torch.equal(greedy, draw(5, top_k=1))  # no randomness left
    with torch.no_grad():
        assert torch.equal(teacher.logits(greedy, LABELS).argmax(-1), greedy)  # argmax given the prefix


def test_cfg_through_the_null_class(teacher):
    tokens = teacher.sample(LABELS, torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = teacher.logits(tokens, LABELS)
        uncond = teacher.logits(tokens, None)
        torch.testing.assert_close(teacher.logits(tokens, LABELS, guidance_scale=2.5), uncond + 2.5 * (cond - uncond),
                                   rtol=1e-5, atol=1e-5)
    _, at_one = teacher.sample(LABELS, torch.Generator().manual_seed(0), guidance_scale=1.0, return_logits=True)
    torch.testing.assert_close(at_one, cond, rtol=0, atol=1e-5)  # scale 1 is the conditional law
    assert not torch.allclose(cond, uncond, atol=1e-3)             # the class token matters


def test_probs_is_the_law_sample_draws_from():
    teacher = AutoregressiveTeacher(tiny_lm("gpt2"), tiny_vq(), C, GRID, temperature=0.7, top_k=4).eval()
    logits = torch.randn(3, 16, K, generator=torch.Generator().manual_seed(0))
    p = teacher.probs(logits)  # the folder's defaults
    assert torch.equal((p > 0).sum(-1), torch.full((3, 16), 4))
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 16))
    kept = logits.topk(4, dim=-1).indices
    torch.testing.assert_close(p.gather(-1, kept), (logits.gather(-1, kept) / 0.7).softmax(-1))
    tokens, step_logits = teacher.sample(LABELS, torch.Generator().manual_seed(0), return_logits=True)
    assert (teacher.probs(step_logits).gather(-1, tokens[..., None]) > 0).all()  # never outside the top k
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        teacher.probs(logits, temperature=0)


def test_save_load_round_trip(tmp_path):
    teacher = AutoregressiveTeacher(tiny_lm("llama"), tiny_vq(), C, GRID, guidance_scale=2.0, top_k=8).eval()
    teacher.save_pretrained(tmp_path / "ar")
    index = json.loads((tmp_path / "ar" / "model_index.json").read_text())
    assert index["_class_name"] == "AutoregressiveTeacher" and index["lm"] == ["transformers", "LlamaForCausalLM"]
    assert index["vq"] == ["diffusers", "VQModel"] and index["token_grid"] == [4, 4] and index["num_classes"] == C
    assert not [p for p in (tmp_path / "ar").rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    loaded = AutoregressiveTeacher.from_pretrained(tmp_path / "ar")
    assert (loaded.guidance_scale, loaded.top_k, loaded.token_grid) == (2.0, 8, GRID)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    tokens = teacher.sample(LABELS, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.logits(tokens, LABELS), teacher.logits(tokens, LABELS))
        assert torch.equal(loaded.decode(tokens), teacher.decode(tokens))
    assert torch.equal(loaded.sample(LABELS, torch.Generator().manual_seed(0)), tokens)


def test_pickles_are_refused_by_name(tmp_path):
    AutoregressiveTeacher(tiny_lm("gpt2"), tiny_vq(), C, GRID).save_pretrained(tmp_path / "ar")
    for f in (tmp_path / "ar" / "lm").glob("*.safetensors"):
        f.unlink()
    (tmp_path / "ar" / "lm" / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: \.bin files are Python pickles") as err:
        AutoregressiveTeacher.from_pretrained(tmp_path / "ar")
    assert "\n" not in str(err.value)


def test_folder_errors_are_one_line(tmp_path):
    AutoregressiveTeacher(tiny_lm("gpt2"), tiny_vq(), C, GRID).save_pretrained(tmp_path / "ar")
    index_file = tmp_path / "ar" / "model_index.json"
    index = json.loads(index_file.read_text())
    cases = [({"_class_name": "OneStepPipeline"}, "_class_name is 'OneStepPipeline'"),
             ({"lm": ["transformers", "CLIPTextModel"]}, "not a transformers causal LM"),
             ({"lm": ["os", "system"]}, "not from"),
             ({"token_grid": [5, 5]}, "positions cannot hold"),
             ({"num_classes": 9}, "vocab_size 20 is too small"),
             ({"top_k": 0}, "top_k must be a positive int")]
    for change, message in cases:
        index_file.write_text(json.dumps({**index, **change}))
        with pytest.raises(ValueError, match=message) as err:
            AutoregressiveTeacher.from_pretrained(tmp_path / "ar")
        assert "\n" not in str(err.value)


def test_encode_decode_layout(teacher):
    """encode -> decode is the VQModel's own quantised reconstruction (same codes, same raster order), decode is
    decode_embeddings of the code vectors, and encode picks the nearest code of each latent vector."""
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        tokens = teacher.encode(images)
        assert tokens.shape == (3, 16) and tokens.dtype == torch.long
        latents = teacher.vq.encode(images).latents.permute(0, 2, 3, 1).reshape(3, 16, -1)
        nearest = ((latents[:, :, None] - teacher.codebook) ** 2).sum(-1).argmin(-1)
        assert torch.equal(tokens, nearest)
        decoded = teacher.decode(tokens)
        torch.testing.assert_close(decoded, teacher.vq(images).sample.clamp(-1, 1))
        torch.testing.assert_close(decoded, teacher.decode_embeddings(teacher.codebook[tokens]))
        # codebook images: an image decoded from codes, re-decoded from the quantised latent, is itself
        torch.testing.assert_close(teacher.vq.decode(teacher.codebook[tokens].reshape(3, 4, 4, -1).permute(0, 3, 1, 2))
                                   .sample.clamp(-1, 1), decoded)
    assert decoded.min() >= -1 and decoded.max() <= 1
    emb = teacher.codebook[tokens].detach().requires_grad_(True)
    teacher.decode_embeddings(emb).square().sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0  # gradients reach the embeddings (DD2's generator)


def test_unconditional_teacher_and_label_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=K + 1, n_positions=17, n_embd=32, n_layer=1, n_head=4,
                                    bos_token_id=K, eos_token_id=K))
    teacher = AutoregressiveTeacher(lm, tiny_vq(), None, GRID).eval()
    tokens, step_logits = teacher.sample(batch_size=3, generator=torch.Generator().manual_seed(0), return_logits=True)
    with torch.no_grad():
        torch.testing.assert_close(teacher.logits(tokens), step_logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="unconditional AR teacher"):
        teacher.logits(tokens, torch.zeros(3, dtype=torch.long))
    conditional = AutoregressiveTeacher(tiny_lm("gpt2"), tiny_vq(), C, GRID)
    with pytest.raises(ValueError, match=r"class_labels must be in 0\.\.2, got 0\.\.3"):
        conditional.sample(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"tokens must be image codes 0\.\.15, got 0\.\.16"):
        conditional.logits(torch.tensor([[0] * 15 + [K]]), torch.tensor([0]))
