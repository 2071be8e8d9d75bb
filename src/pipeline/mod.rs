//! Text → latents → image: the CLIP tokenizer ([`tokenizer`]) and the diffusers-exact noise
//! schedulers ([`scheduler`]: PNDM, DDIM, DDPM, Euler, Euler ancestral, DPM-Solver++ multistep, LMS),
//! configured from a pipeline's `tokenizer/` and `scheduler/scheduler_config.json`.

pub mod prompt;
pub mod scheduler;
pub mod tokenizer;
pub mod txt2img;
