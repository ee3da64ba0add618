import json

from serve.profile import main


def test_the_profile_command_names_every_phase_of_a_step_and_writes_its_figures(bases, capsys, tmp_path):
    assert main(["--base", str(bases["nf4"]), "--streams", "2", "--steps", "2", "--prompt-tokens", "5",
                 "--adapter", f"a={bases['adapters'] / 'nf4-a'}", "--json", str(tmp_path / "profile.json")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "decode, 2 streams over 1 adapters" in out and "prefill, one prompt of 5 tokens" in out
    for phase in ("q, k, v projections", "attention", "output head", "norms", "down projection"):
        assert phase in out
    figures = json.loads((tmp_path / "profile.json").read_text())
    decode = figures["decode, 2 streams over 1 adapters"]
    assert decode["steps"] == 2 and decode["ms_a_step"] > 0 and set(decode["phases_ms"]) >= {"attention", "output head"}
