// pm2 apps for hosts without Docker (RunPod/Vast-style containers): the vLLM teacher, a miner and
// a validator as plain processes (docs/deploy.md, "Without Docker").
//
//   set -a; . docker/.env; set +a        # the same variables as docker/compose.yaml
//   pm2 start deploy/pm2/ecosystem.config.js --only q24-teacher,q24-miner
//   pm2 save && pm2 startup               # start again after a reboot
//
// Paths are relative to the checkout; the node runs from .venv (Q24_PYTHON to change it) and the
// teacher from .venv-vllm (Q24_VLLM). tests/docker/test_deploy.py checks that every flag below
// parses (it evaluates this file with node and the variables of docker/.env.example).
const path = require("path");

const ROOT = path.resolve(__dirname, "..", "..");

// A variable from the environment, or the default when it is unset or empty.
function env(name, fallback) {
  const value = process.env[name];
  return value === undefined || value === "" ? fallback : value;
}

// A variable holding several words (sources, extra flags): split on whitespace.
function words(name, fallback) {
  return env(name, fallback).split(/\s+/).filter(Boolean);
}

const PYTHON = env("Q24_PYTHON", path.join(ROOT, ".venv", "bin", "python"));
const VLLM = env("Q24_VLLM", path.join(ROOT, ".venv-vllm", "bin", "vllm"));
const TEACHER_PORT = env("TEACHER_PORT", "8000");
const SERVED_NAME = env("TEACHER_SERVED_NAME", "Qwen/Qwen3-4B");
const REVISION = env("TEACHER_REVISION", "main");

// What both nodes pass: chain, teacher and competition.
function nodeArgs(walletName, walletHotkey) {
  return [
    "--netuid", env("NETUID", "24"),
    "--subtensor.network", env("SUBTENSOR_NETWORK", "finney"),
    "--wallet.name", walletName,
    "--wallet.hotkey", walletHotkey,
    "--wallet.path", env("WALLETS_DIR", "~/.bittensor/wallets"),
    "--teacher.kind", "vllm-server",
    "--teacher.url", env("TEACHER_URL", `http://127.0.0.1:${TEACHER_PORT}`),
    "--teacher.model", SERVED_NAME,
    "--teacher.revision", REVISION,
    "--competition.tokenizer", env("TOKENIZER_DIR", "~/q24-tokenizer"),
    "--competition.preset", env("COMPETITION_PRESET", "3b-a1b"),
    "--logging.format", "json",
  ];
}

// pm2 restarts a process that exits; give a crashing one time between tries, and give a stopping
// node time to finish its step (SIGTERM stops it between steps; state is written atomically).
const common = {
  cwd: ROOT,
  autorestart: true,
  restart_delay: 10000,
  kill_timeout: 120000,
  merge_logs: true,
  time: true,
};

module.exports = {
  apps: [
    {
      ...common,
      name: "q24-teacher",
      script: VLLM,
      interpreter: "none",
      args: [
        "serve", env("TEACHER_MODEL", "Qwen/Qwen3-4B"),
        "--revision", REVISION,
        "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1",
        "--port", TEACHER_PORT,
        "--max-logprobs", "128",
        "--gpu-memory-utilization", env("TEACHER_GPU_MEMORY_UTILIZATION", "0.25"),
        "--max-model-len", env("TEACHER_MAX_MODEL_LEN", "8192"),
      ],
      env: { CUDA_VISIBLE_DEVICES: env("TEACHER_GPU", "0"), VLLM_NO_USAGE_STATS: "1" },
      kill_timeout: 30000,
    },
    {
      ...common,
      name: "q24-miner",
      script: "neurons/miner.py",
      interpreter: PYTHON,
      args: [
        ...nodeArgs(env("WALLET_NAME", "default"), env("WALLET_HOTKEY", "default")),
        "--train.sources", ...words("TRAIN_SOURCES", ""),
        "--publish.repo", env("PUBLISH_REPO", ""),
        "--train.overrides", env("MINER_TRAIN_OVERRIDES", "{}"),
        ...words("MINER_EXTRA_ARGS", ""),
      ],
      env: { CUDA_VISIBLE_DEVICES: env("MINER_GPU", "0") },
    },
    {
      ...common,
      name: "q24-validator",
      script: "neurons/validator.py",
      interpreter: PYTHON,
      args: [
        ...nodeArgs(env("VALIDATOR_WALLET_NAME", "default"), env("VALIDATOR_WALLET_HOTKEY", "default")),
        "--kl.sources", ...words("KL_SOURCES", ""),
        "--longctx.lengths", env("LONGCTX_LENGTHS", "4k,16k,64k,256k,1m"),
        ...words("VALIDATOR_EXTRA_ARGS", ""),
      ],
      env: { CUDA_VISIBLE_DEVICES: env("VALIDATOR_GPU", "0") },
    },
  ],
};
