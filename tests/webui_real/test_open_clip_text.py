"""AFA's SD 2.x text tower (training/open_clip_text.py, which never imports open_clip) against open_clip's own model
and ldm's FrozenOpenCLIPEmbedder.encode_with_transformer (the WebUI's SD 2.x conditioning), in a real A1111 1.10
install's venv: the same key names, token ids, and context for the same weights (open_clip's ViT-B-32 text tower,
random weights, nothing downloaded).

Opt-in, like the rest of tests/webui_real (its fixtures skip without AFA_WEBUI_DIR):
AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui
"""

import textwrap


SCRIPT = textwrap.dedent("""
    import open_clip, torch
    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
    from training.open_clip_text import load_open_clip_text_encoder, pad_after_end
    from training.text_encoder import END_OF_TEXT_ID, encode, tokenize

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    del model.visual
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    ours = load_open_clip_text_encoder(model.state_dict(), "ViT-B-32")
    embedder = FrozenOpenCLIPEmbedder.__new__(FrozenOpenCLIPEmbedder)
    torch.nn.Module.__init__(embedder)
    embedder.model, embedder.layer, embedder.layer_idx, embedder.device = model.eval(), "penultimate", 1, "cpu"
    prompts = ["a photo of a cat", "", "an oil painting of a lighthouse at dusk, highly detailed"]
    reference_ids = open_clip.tokenize(prompts)
    ids = pad_after_end(tokenize(prompts), END_OF_TEXT_ID)
    assert torch.equal(ids, reference_ids), (ids[:, :12], reference_ids[:, :12])
    with torch.no_grad():
        expected = embedder.encode_with_transformer(reference_ids)
        got = encode(ours, tokenize(prompts))
    difference = (expected - got).abs().max().item()
    print(f"max |ldm FrozenOpenCLIPEmbedder - ours| = {difference:.3g} for context {tuple(got.shape)}")
    assert difference < 5e-5, difference  # float32 rounding of another order of operations
""")


def test_the_sd2_text_tower_equals_open_clip_and_the_webuis_embedder(webui_python):
    print(webui_python("-c", SCRIPT).stdout.strip())
