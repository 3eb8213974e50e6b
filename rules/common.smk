# Parse-time state: the validated config, the case list and the split (deterministic from the config).
from lungddpm.cases import DEMO_ROOT, case_split, dicom_root, list_cases
from lungddpm.config import validate_config, config_from_mapping

validate_config(config, source="snakemake config")
CFG = config_from_mapping(config)
CASES = list_cases(CFG)
SPLIT = case_split(CFG, CASES)
DICOM_ROOT = str(dicom_root(CFG))
IS_DEMO = CFG.data.source == "demo"


def final_targets():
    targets = expand("results/layouts/{case}.nii.gz", case=CASES) + ["results/splits.csv"]
    targets.append(f"results/models/{config['train']['name']}/checkpoint.pt")
    if IS_DEMO:
        targets.append("results/qc/demo_segmentation.csv")
    return targets


def subset_cases(subset):
    """Cases of one split subset (train / val / test), sorted."""
    return sorted(case for case, where in SPLIT.items() if where == subset)


def settings(*sections):
    """Config sections a rule depends on, passed as params so that editing them reruns the rule."""
    return {name: config[name] for name in sections}


def series_input(wildcards):
    """Demo: the manifest written last by demo_dicom. Real data has no buildable input."""
    if IS_DEMO:
        return {"manifest": f"{DEMO_ROOT}/series/{wildcards.case}.json"}
    return {}
