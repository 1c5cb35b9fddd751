"""Stand-in of modules/textual_inversion/textual_inversion.py (v1.10): an EmbeddingDatabase that never finds any
embeddings (textual inversion is not reproduced)."""


class EmbeddingDatabase:
    def __init__(self):
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.skipped_embeddings = {}
        self.expected_shape = -1
        self.embedding_dirs = {}
        self.previously_displayed_embeddings = ()

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = path

    def clear_embedding_dirs(self):
        self.embedding_dirs.clear()

    def load_textual_inversion_embeddings(self, force_reload=False):
        pass

    def find_embedding_at_position(self, tokens, offset):
        return None, None
