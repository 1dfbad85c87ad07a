from dcbench.cli import run

run()
