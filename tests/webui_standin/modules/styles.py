"""Stand-in of modules/styles.py (v1.10): StyleDatabase with no styles (style files are not read)."""


class PromptStyle:
    def __init__(self, name, prompt, negative_prompt, path=None):
        self.name = name
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.path = path


# modules/styles.py (v1.10): apply_styles_to_prompt (same logic: "{prompt}" placeholder or ", " join)
def merge_prompts(style_prompt: str, prompt: str) -> str:
    if "{prompt}" in style_prompt:
        res = style_prompt.replace("{prompt}", prompt)
    else:
        parts = filter(None, (prompt.strip(), style_prompt.strip()))
        res = ", ".join(parts)

    return res


def apply_styles_to_prompt(prompt, styles):
    for style in styles:
        prompt = merge_prompts(style, prompt)

    return prompt


class StyleDatabase:
    def __init__(self, paths=None):
        self.no_style = PromptStyle("None", "", "", None)
        self.styles = {}
        self.paths = paths or []

    def reload(self):
        self.styles.clear()

    def get_style_prompts(self, styles):
        return [self.styles.get(x, self.no_style).prompt for x in styles]

    def get_negative_style_prompts(self, styles):
        return [self.styles.get(x, self.no_style).negative_prompt for x in styles]

    def apply_styles_to_prompt(self, prompt, styles):
        return apply_styles_to_prompt(prompt, [self.styles.get(x, self.no_style).prompt for x in styles])

    def apply_negative_styles_to_prompt(self, prompt, styles):
        return apply_styles_to_prompt(prompt, [self.styles.get(x, self.no_style).negative_prompt for x in styles])

    def extract_styles_from_prompt(self, prompt, negative_prompt):
        return [], prompt, negative_prompt
