"""The demos: ``python -m eellm_hf.demo`` (``make demo``) EE-Tunes a real pretrained model (:mod:`.ee_tune`);
``python -m eellm_hf.demo.pretrain`` (``make demo-pretrain``) trains an early-exit model from scratch."""
