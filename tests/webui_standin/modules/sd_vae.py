"""Stand-in of modules/sd_vae.py (v1.10): no external VAE files; the checkpoint's own VAE is always used.

`reload_vae_weights`/`load_vae` keep their signatures and do nothing; `get_loaded_vae_name/hash` return None
(so infotext has no "VAE"/"VAE hash", as with a checkpoint whose VAE is not overridden).
"""

vae_dict = {}
base_vae = None
loaded_vae_file = None
checkpoint_info = None
unspecified = object()


class VaeResolution:
    def __init__(self, vae=None, source=None, resolved=True):
        self.vae = vae
        self.source = source
        self.resolved = resolved

    def tuple(self):
        return self.vae, self.source


def get_loaded_vae_name():
    return None


def get_loaded_vae_hash():
    return None


def refresh_vae_list():
    vae_dict.clear()


def resolve_vae(checkpoint_file):
    return VaeResolution(None, "from checkpoint")


def delete_base_vae():
    global base_vae
    base_vae = None


def clear_loaded_vae():
    global loaded_vae_file
    loaded_vae_file = None


def load_vae(model, vae_file=None, vae_source="from unknown source"):
    pass


def reload_vae_weights(sd_model=None, vae_file=unspecified):
    from modules import shared
    return sd_model or shared.sd_model
