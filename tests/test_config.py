
import pytest
import yaml

from utils.config import ArgumentParser, config_to_dict, load_config, parse_with_config, save_config
from utils.errors import UserError


def make_parser():
    parser = ArgumentParser()
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim")
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--name", default=None)
    return parser


def write(tmp_path, text):
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_then_yaml_then_flags(tmp_path):
    preset = write(tmp_path, "lr: 0.002\nbatch_size: 32\nsampler: ddpm\n")
    args = parse_with_config(make_parser(), ["--config", preset, "--batch_size", "4"])
    assert args.lr == 0.002  # from YAML
    assert args.batch_size == 4  # flag beats YAML
    assert args.sampler == "ddpm"
    assert args.amp is True  # untouched default
    assert args.config == preset


def test_switch_by_option_name_and_by_dest(tmp_path):
    assert parse_with_config(make_parser(), ["--config", write(tmp_path, "no-amp: true\n")]).amp is False
    assert parse_with_config(make_parser(), ["--config", write(tmp_path, "amp: false\n")]).amp is False
    assert parse_with_config(make_parser(), ["--config", write(tmp_path, "no_amp: false\n")]).amp is True


def test_string_values_are_converted_with_the_flag_type(tmp_path):
    args = parse_with_config(make_parser(), ["--config", write(tmp_path, "lr: '3e-4'\n")])
    assert args.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rate: 0.1\n", "unknown key 'learning_rate'"),
        ("sampler: euler\n", "'sampler: euler' is not one of ddpm, ddim"),
        ("- a\n- b\n", "expected a mapping"),
        ("lr: [1\n", "not valid YAML"),
        ("no-amp: maybe\n", "is a switch"),
    ],
)
def test_bad_presets_name_the_file_and_key(tmp_path, text, message):
    preset = write(tmp_path, text)
    with pytest.raises(UserError, match="preset.yaml") as err:
        parse_with_config(make_parser(), ["--config", preset])
    assert message in str(err.value)


def test_missing_preset_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        parse_with_config(make_parser(), ["--config", str(tmp_path / "nope.yaml")])


def test_resolved_config_round_trip(tmp_path):
    args = parse_with_config(make_parser(), ["--name", "run"])
    args.output = tmp_path / "out"  # a Path becomes a string
    args.plan = (16, 2)  # a tuple becomes a list
    plain = config_to_dict(args)
    assert plain["output"] == str(tmp_path / "out") and plain["plan"] == [16, 2]
    path = save_config(args, tmp_path / "args.yaml")
    assert load_config(path) == plain


def test_a_saved_run_config_is_a_preset_that_reproduces_the_run(tmp_path):
    """args.yaml of a run, given back as --config (its keys that are not flags dropped), reproduces every setting
    of that run; each setting differs from its default, so a key that is written but not read back fails here."""
    given = ["--lr", "0.005", "--batch_size", "3", "--sampler", "ddpm", "--no-amp", "--name", "run"]
    args = parse_with_config(make_parser(), given)
    defaults = vars(parse_with_config(make_parser(), []))
    settings = {key: value for key, value in vars(args).items() if key != "config"}
    assert all(value != defaults[key] for key, value in settings.items())
    saved = load_config(save_config(args, tmp_path / "args.yaml"))
    preset = write(tmp_path, yaml.safe_dump({key: saved[key] for key in settings}))
    reloaded = vars(parse_with_config(make_parser(), ["--config", preset]))
    assert {key: reloaded[key] for key in settings} == settings


def test_explicitly_given_separates_flags_and_preset_keys_from_defaults(tmp_path):
    from utils.config import explicitly_given

    parser = make_parser()
    preset = write(tmp_path, "lr: 0.002\n")
    args = parse_with_config(parser, ["--config", preset, "--no-amp"])
    assert explicitly_given(parser, ["--config", preset, "--no-amp"], args.config) == {"lr", "amp"}
    assert explicitly_given(parser, [], None) == set()
    assert args.batch_size == 8  # the probe does not disturb the real parser's defaults


def test_alias_actions_in_presets(tmp_path):
    """A house flag with aliases (utils/cli.py): the preset key of the destination reaches the house flag's checks,
    a translating alias converts numbers, and a switch alias set to false leaves the house default alone."""
    from utils.cli import add_training_arguments

    def parser():
        p = ArgumentParser()
        add_training_arguments(p, defaults=dict(mixed_precision="auto", compile=True, report_to="none"))
        return p

    assert parse_with_config(parser(), ["--config", write(tmp_path, "precision: 32\n")]).mixed_precision == "no"
    assert parse_with_config(parser(), ["--config", write(tmp_path, "no-amp: false\n")]).mixed_precision == "auto"
    assert parse_with_config(parser(), ["--config", write(tmp_path, "no_compile: true\n")]).compile is False
    with pytest.raises(UserError, match="'mixed_precision: fp8' is not a valid value"):
        parse_with_config(parser(), ["--config", write(tmp_path, "mixed_precision: fp8\n")])
