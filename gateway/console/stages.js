// Progress per stage, from the latest `progress` of a Video (gw-design.md: stage, step, of, elapsed, eta).
// Stages run in this order; a progress report for stage k means every stage before k is done.

export const STAGES = [
  { name: "text_encode", label: "Text encode" },
  { name: "vae_encode", label: "Image encode", task: "i2v" },
  { name: "diffusion", label: "Diffusion steps" },
  { name: "vae_decode", label: "Decode" },
  { name: "upload", label: "Upload" },
];

export const TERMINAL = new Set(["completed", "failed", "cancelled"]);

/**
 * The stages of `video.task` with the done fraction of each, in [0, 1]:
 *   completed            -> 1 everywhere;
 *   progress at stage k  -> 1 before k, step/of at k, 0 after k;
 *   no progress yet      -> 0 everywhere.
 */
export function stageFractions(video) {
  const stages = STAGES.filter((s) => !s.task || s.task === video.task);
  const done = video.status === "completed";
  const p = video.progress;
  const current = p ? stages.findIndex((s) => s.name === p.stage) : -1;
  return stages.map((stage, i) => {
    let fraction = 0;
    if (done || i < current) fraction = 1;
    else if (i === current) fraction = p.of > 0 ? Math.min(1, Math.max(0, p.step / p.of)) : 0;
    return { ...stage, fraction, step: i === current ? p.step : null, of: i === current ? p.of : null };
  });
}
