"""Stand-in of modules/ui_settings.py (v1.10): the Settings page's components and the values it loads.

Copied: `get_value_for_setting`, `create_setting_component`, and from `UiSettings` the layout loop of `create_ui`
(a tab per section, a component per setting, quicksettings kept for the top row) and, of `add_functionality`, the
quicksettings row and the page-load event that pushes `gr.update(value=..., **component_args)` to every setting
component: one failing update fails the whole load (every setting then shows an error in the browser). Not
reproduced: Apply/Reload buttons, Defaults/Sysinfo/Actions/Licenses tabs, search.
"""

import gradio as gr

from modules import ui_common, shared
from modules.shared import opts
from modules.ui_components import FormRow


# modules/ui_settings.py (v1.10): get_value_for_setting
def get_value_for_setting(key):
    value = getattr(opts, key)

    info = opts.data_labels[key]
    args = info.component_args() if callable(info.component_args) else info.component_args or {}
    args = {k: v for k, v in args.items() if k not in {'precision'}}

    return gr.update(value=value, **args)


# modules/ui_settings.py (v1.10): create_setting_component
def create_setting_component(key, is_quicksettings=False):
    def fun():
        return opts.data[key] if key in opts.data else opts.data_labels[key].default

    info = opts.data_labels[key]
    t = type(info.default)

    args = info.component_args() if callable(info.component_args) else info.component_args

    if info.component is not None:
        comp = info.component
    elif t == str:
        comp = gr.Textbox
    elif t == int:
        comp = gr.Number
    elif t == bool:
        comp = gr.Checkbox
    else:
        raise Exception(f'bad options item type: {t} for key {key}')

    elem_id = f"setting_{key}"

    if info.refresh is not None:
        if is_quicksettings:
            res = comp(label=info.label, value=fun(), elem_id=elem_id, **(args or {}))
            ui_common.create_refresh_button(res, info.refresh, info.component_args, f"refresh_{key}")
        else:
            with FormRow():
                res = comp(label=info.label, value=fun(), elem_id=elem_id, **(args or {}))
                ui_common.create_refresh_button(res, info.refresh, info.component_args, f"refresh_{key}")
    else:
        res = comp(label=info.label, value=fun(), elem_id=elem_id, **(args or {}))

    return res


class UiSettings:
    components = None
    component_dict = None
    quicksettings_list = None
    quicksettings_names = None

    # modules/ui_settings.py (v1.10): UiSettings.create_ui (the settings tabs)
    def create_ui(self):
        self.components = []
        self.component_dict = {}

        shared.settings_components = self.component_dict

        opts.reorder()

        with gr.Blocks(analytics_enabled=False) as settings_interface:
            self.quicksettings_names = opts.quicksettings_list
            self.quicksettings_names = {x: i for i, x in enumerate(self.quicksettings_names) if x != 'quicksettings'}

            self.quicksettings_list = []

            previous_section = None
            current_tab = None
            current_row = None
            with gr.Tabs(elem_id="settings"):
                for i, (k, item) in enumerate(opts.data_labels.items()):
                    section_must_be_skipped = item.section[0] is None

                    if previous_section != item.section and not section_must_be_skipped:
                        elem_id, text = item.section[:2]

                        if current_tab is not None:
                            current_row.__exit__()
                            current_tab.__exit__()

                        gr.Group()
                        current_tab = gr.TabItem(elem_id=f"settings_{elem_id}", label=text)
                        current_tab.__enter__()
                        current_row = gr.Column(elem_id=f"column_settings_{elem_id}", variant='compact')
                        current_row.__enter__()

                        previous_section = item.section

                    if k in self.quicksettings_names and not shared.cmd_opts.freeze_settings:
                        self.quicksettings_list.append((i, k, item))
                    elif section_must_be_skipped:
                        pass
                    else:
                        component = create_setting_component(k)
                        self.component_dict[k] = component
                        self.components.append(component)

                if current_tab is not None:
                    current_row.__exit__()
                    current_tab.__exit__()

        self.interface = settings_interface

    # modules/ui_settings.py (v1.10): UiSettings.add_quicksettings
    def add_quicksettings(self):
        with gr.Row(elem_id="quicksettings", variant="compact"):
            for _i, k, _item in sorted(self.quicksettings_list, key=lambda x: self.quicksettings_names.get(x[1], x[0])):
                component = create_setting_component(k, is_quicksettings=True)
                self.component_dict[k] = component

    # modules/ui_settings.py (v1.10): UiSettings.add_functionality (the page-load event)
    def add_functionality(self, demo):
        component_keys = [k for k in opts.data_labels.keys() if k in self.component_dict]

        def get_settings_values():
            return [get_value_for_setting(key) for key in component_keys]

        demo.load(
            fn=get_settings_values,
            inputs=[],
            outputs=[self.component_dict[k] for k in component_keys],
            queue=False,
        )
