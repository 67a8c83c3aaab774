"""RLHF: the PPO math as pure functions (``core``), PPO's actor/critic losses as Trainer objectives
(``objectives``) and the co-located PPO loop (``ppo``)."""
