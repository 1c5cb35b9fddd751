"""Stand-in of modules/ui.py (v1.10): `create_ui()`, reduced to what extensions interact with.

Kept: the order of create_ui (infotext paste fields reset -> `ui_settings_callback()` (UiSettings.register_settings)
-> txt2img tab: `initialize_scripts(False)`, `prepare_ui()`, prompt/parameter components, `setup_ui()` (always-on
scripts in their `gr.Group`s, the "Script" dropdown, selectable scripts; this assigns `args_from`/`args_to`),
paste fields with `api=` names -> the same for img2img -> `ui_tabs_callback()` tabs rendered into the demo) and
`scripts.scripts_current` set while a tab's components are created), plus what extensions' settings and infotext
fields meet: the paste button of each tab (ParamBinding with its prompt), the txt2img gallery's "Send to img2img"
button (ui_common.create_output_panel: a ParamBinding with `source_tabname` and the runner's `paste_field_names`),
the Settings page (ui_settings.UiSettings: components, quicksettings, the page-load event) and
`connect_paste_params_buttons()`. The real toprow, the rest of the output panel and JavaScript are not built.
"""

import gradio as gr

from modules import scripts, script_callbacks, shared, infotext_utils, sd_samplers, ui_settings
from modules.infotext_utils import PasteField
from modules.shared import opts
from modules.ui_components import FormRow, InputAccordion

txt2img_paste_fields = []
img2img_paste_fields = []
paste_buttons = {}  # stand-in: tab name -> its paste button, for tests
send_to_buttons = {}  # stand-in: tab name -> {"img2img": button, ...} of its gallery
settings = None  # stand-in: the UiSettings of the last create_ui()


def create_tab(is_img2img):
    tabname = "img2img" if is_img2img else "txt2img"
    runner = scripts.scripts_img2img if is_img2img else scripts.scripts_txt2img

    scripts.scripts_current = runner
    runner.initialize_scripts(is_img2img=is_img2img)

    with gr.Blocks(analytics_enabled=False) as interface:
        prompt = gr.Textbox(label="Prompt", elem_id=f"{tabname}_prompt", lines=3)
        negative_prompt = gr.Textbox(label="Negative prompt", elem_id=f"{tabname}_neg_prompt", lines=3)

        runner.prepare_ui()

        with FormRow():
            sampler_name = gr.Dropdown(label='Sampling method', elem_id=f"{tabname}_sampling", choices=sd_samplers.visible_sampler_names(), value=sd_samplers.visible_sampler_names()[0])
            steps = gr.Slider(minimum=1, maximum=150, step=1, elem_id=f"{tabname}_steps", label="Sampling steps", value=20)
        with FormRow():
            width = gr.Slider(minimum=64, maximum=2048, step=8, label="Width", value=512, elem_id=f"{tabname}_width")
            height = gr.Slider(minimum=64, maximum=2048, step=8, label="Height", value=512, elem_id=f"{tabname}_height")
        cfg_scale = gr.Slider(minimum=1.0, maximum=30.0, step=0.5, label='CFG Scale', value=7.0, elem_id=f"{tabname}_cfg_scale")
        seed = gr.Number(label='Seed', value=-1, elem_id=f"{tabname}_seed", precision=0)
        denoising_strength = gr.Slider(minimum=0.0, maximum=1.0, step=0.01, label='Denoising strength', value=0.7 if not is_img2img else 0.75, elem_id=f"{tabname}_denoising_strength")

        if not is_img2img:
            with InputAccordion(False, label="Hires. fix", elem_id="txt2img_hr") as enable_hr:
                hr_scale = gr.Slider(minimum=1.0, maximum=4.0, step=0.05, label="Upscale by", value=2.0, elem_id="txt2img_hr_scale")
                hr_second_pass_steps = gr.Slider(minimum=0, maximum=150, step=1, label='Hires steps', value=0, elem_id="txt2img_hires_steps")
                hr_checkpoint_name = gr.Dropdown(label='Hires checkpoint', elem_id="hr_checkpoint", choices=["Use same checkpoint"] + shared.list_checkpoint_tiles(False), value="Use same checkpoint")

        override_settings = gr.Dropdown([], label="Override settings", visible=False, elem_id=f"{tabname}_override_settings", multiselect=True)

        with gr.Column(elem_id=f"{tabname}_script_container"):
            runner.setup_ui()

        paste = gr.Button(value="\u2199\ufe0f", elem_id=f"{tabname}_paste")  # toprow.paste
        gallery = gr.Gallery(label="Output", elem_id=f"{tabname}_gallery")
        if not is_img2img:
            # modules/ui_common.py (v1.10): create_output_panel, the send-to buttons of the txt2img gallery
            buttons = infotext_utils.create_buttons(["img2img", "inpaint"])  # (and "extras", not reproduced)
            for paste_tabname, paste_button in buttons.items():
                infotext_utils.register_paste_params_button(infotext_utils.ParamBinding(
                    paste_button=paste_button, tabname=paste_tabname, source_tabname="txt2img", source_image_component=gallery,
                    paste_field_names=runner.paste_field_names
                ))
            send_to_buttons[tabname] = buttons

        paste_fields = [
            PasteField(prompt, "Prompt", api="prompt"),
            PasteField(negative_prompt, "Negative prompt", api="negative_prompt"),
            PasteField(cfg_scale, "CFG scale", api="cfg_scale"),
            PasteField(width, "Size-1", api="width"),
            PasteField(height, "Size-2", api="height"),
            PasteField(steps, "Steps", api="steps"),
            PasteField(sampler_name, sd_samplers.get_sampler_from_infotext, api="sampler_name"),
            PasteField(seed, "Seed", api="seed"),
            PasteField(denoising_strength, "Denoising strength", api="denoising_strength"),
        ]
        if not is_img2img:
            paste_fields += [
                PasteField(enable_hr, lambda d: "Denoising strength" in d and ("Hires upscale" in d or "Hires upscaler" in d or "Hires resize-1" in d), api="enable_hr"),
                PasteField(hr_scale, "Hires upscale", api="hr_scale"),
                PasteField(hr_second_pass_steps, "Hires steps", api="hr_second_pass_steps"),
                PasteField(hr_checkpoint_name, "Hires checkpoint", api="hr_checkpoint_name"),
            ]
        paste_fields += runner.infotext_fields
        infotext_utils.add_paste_fields(tabname, None, paste_fields, override_settings)
        if is_img2img:  # modules/ui.py: the inpaint tab shares img2img's fields
            infotext_utils.add_paste_fields("inpaint", None, paste_fields, override_settings)
        infotext_utils.register_paste_params_button(infotext_utils.ParamBinding(
            paste_button=paste, tabname=tabname, source_text_component=prompt, source_image_component=None,
        ))
        paste_buttons[tabname] = paste

    scripts.scripts_current = None
    return interface


# modules/ui.py (v1.10): create_ui (reduced; see module docstring)
def create_ui():
    global settings
    infotext_utils.reset()
    paste_buttons.clear()
    send_to_buttons.clear()

    settings = ui_settings.UiSettings()
    # modules/ui_settings.py: UiSettings.register_settings
    script_callbacks.ui_settings_callback()
    opts.reorder()

    txt2img_interface = create_tab(is_img2img=False)
    img2img_interface = create_tab(is_img2img=True)

    settings.create_ui()

    interfaces = [
        (txt2img_interface, "txt2img", "txt2img"),
        (img2img_interface, "img2img", "img2img"),
    ]

    interfaces += script_callbacks.ui_tabs_callback()
    interfaces += [(settings.interface, "Settings", "settings")]

    with gr.Blocks(analytics_enabled=False, title="Stable Diffusion") as demo:
        settings.add_quicksettings()

        with gr.Tabs(elem_id="tabs"):
            for interface, label, ifid in interfaces:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()

        settings.add_functionality(demo)

        infotext_utils.connect_paste_params_buttons()

    return demo
