"""Policy-gradient RL: PPO, GRPO and RLOO as rows of one objectives table (`objectives.py`)
run by one driver (`driver.py`)."""
