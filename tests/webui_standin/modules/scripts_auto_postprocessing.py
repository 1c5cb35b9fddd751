"""Stand-in of modules/scripts_auto_postprocessing.py (v1.10): no Extras scripts run automatically (the real one wraps
the Extras scripts listed in opts.postprocessing_enable_in_main_ui, empty by default)."""


def create_auto_preprocessing_script_data():
    return []
