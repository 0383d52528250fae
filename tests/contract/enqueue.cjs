// A producer written without vlmq's Python code, from docs/contract.md alone: store each
// image under its claim-check key, LPUSH a task message, then poll the stored results.
// Usage: node enqueue.cjs REDIS_URL QUESTION IMAGE_FILE... ; prints one JSON line per task:
// {"task_id", "kwargs", "meta"} where meta is the stored result as Redis holds it.
"use strict";
const crypto = require("node:crypto");
const fs = require("node:fs");
const { createClient } = require("redis");

const QUEUE = "vlmq";
const IMAGE_TTL_S = 10800;
const READY = new Set(["SUCCESS", "FAILURE", "REVOKED"]);

function message(taskId, kwargs) {
  const body = Buffer.from(JSON.stringify([[], kwargs, {}])).toString("base64");
  return JSON.stringify({
    body,
    "content-encoding": "utf-8",
    "content-type": "application/json",
    headers: {
      lang: "js",
      task: "vlmq.analyze",
      id: taskId,
      root_id: taskId,
      parent_id: null,
      group: null,
      retries: 0,
      eta: null,
      expires: null,
    },
    properties: {
      correlation_id: taskId,
      delivery_mode: 2,
      delivery_info: { exchange: QUEUE, routing_key: QUEUE },
      priority: 0,
      body_encoding: "base64",
      delivery_tag: crypto.randomUUID(),
    },
  });
}

async function main() {
  const [url, question, ...files] = process.argv.slice(2);
  const redis = createClient({ url });
  await redis.connect();
  const tasks = [];
  for (const file of files) {
    const data = fs.readFileSync(file);
    const imageKey = "vlmq:image:" + crypto.createHash("sha256").update(data).digest("hex");
    await redis.set(imageKey, data, { EX: IMAGE_TTL_S, NX: true });
    const kwargs = {
      image_key: imageKey,
      question,
      max_new_tokens: 4,
      temperature: 0.0,
      top_p: 1.0,
      submitted_at: Date.now() / 1000,
      model: null,
    };
    const taskId = crypto.randomUUID();
    await redis.lPush(QUEUE, message(taskId, kwargs));
    tasks.push({ task_id: taskId, kwargs });
  }
  const deadline = Date.now() + 60000;
  for (const task of tasks) {
    for (;;) {
      const raw = await redis.get("celery-task-meta-" + task.task_id);
      const meta = raw === null ? null : JSON.parse(raw);
      if (meta !== null && READY.has(meta.status)) {
        console.log(JSON.stringify({ ...task, meta }));
        break;
      }
      if (Date.now() > deadline) throw new Error("no result for " + task.task_id);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
  await redis.quit();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
