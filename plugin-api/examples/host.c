/*
 * A C host for the lorafuse plugin: dlopen, get the v1 table, open a pipeline, apply a LoRA,
 * generate, switch the LoRA on the live pipeline, generate again, write PPM images.
 *
 *   cc -std=c99 -Wall -Wextra -I plugin-api/include plugin-api/examples/host.c -ldl -o host
 *   ./host target/debug/liblorafuse.so models/tiny/onnx \
 *       models/tiny/loras/diffusers.safetensors models/tiny/loras/kohya_wide.safetensors 0.6 out/
 *
 * Writes out/a.ppm (first LoRA, weight 1) and out/b.ppm (second LoRA at the given weight), and
 * out/a.txt, out/b.txt with the A1111 parameters text. Settings: prompt "a photo of a cat",
 * negative "blurry", 4 steps, guidance 7.5, seed 42, CPU, 1 thread.
 */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lorafuse.h"

static const LorafuseApi *api;

/* Print and free a status; returns 1 when it was an error. */
static int failed(LorafuseStatus *st, const char *what) {
    if (!st) return 0;
    fprintf(stderr, "%s: error %u: %s\n", what, api->status_code(st), api->status_message(st));
    api->release_status(st);
    return 1;
}

static void on_log(void *userdata, uint32_t level, const char *message) {
    (void)userdata;
    fprintf(stderr, "[lorafuse %u] %s\n", level, message);
}

static bool on_progress(void *userdata, uint32_t step, uint32_t total) {
    unsigned *calls = (unsigned *)userdata;
    ++*calls;
    fprintf(stderr, "\rstep %u/%u", step, total);
    if (step == total) fputc('\n', stderr);
    return true; /* false would cancel */
}

static int write_outputs(const LorafuseImage *img, const char *dir, const char *name) {
    uint32_t w = 0, h = 0;
    const uint8_t *px = api->image_pixels(img, 0, &w, &h);
    if (!px) return 1;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.ppm", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); return 1; }
    fprintf(f, "P6\n%u %u\n255\n", w, h);
    fwrite(px, 1, (size_t)w * h * 3, f);
    fclose(f);
    snprintf(path, sizeof path, "%s/%s.txt", dir, name);
    f = fopen(path, "wb");
    if (!f) { perror(path); return 1; }
    fputs(api->image_parameters(img, 0), f);
    fclose(f);
    printf("%s/%s.ppm %ux%u seed %llu\n", dir, name, w, h, (unsigned long long)api->image_seed(img, 0));
    return 0;
}

static int generate_to(LorafusePipeline *p, const char *dir, const char *name) {
    unsigned calls = 0;
    /* Ask init for this header's version of the struct. */
    LorafuseGenerateParams gp = {.struct_version = LORAFUSE_GENERATE_PARAMS_VERSION};
    if (failed(api->init_generate_params(&gp), "init_generate_params")) return 1;
    gp.prompt = "a photo of a cat";
    gp.negative_prompt = "blurry";
    gp.steps = 4;
    gp.guidance_scale = 7.5f;
    gp.seed = 42;
    gp.progress = on_progress;
    gp.userdata = &calls;
    LorafuseImage *img = NULL;
    if (failed(api->generate(p, &gp, &img), "generate")) return 1;
    int rc = write_outputs(img, dir, name);
    api->release_image(img);
    if (calls == 0) { fprintf(stderr, "the progress callback was never called\n"); return 1; }
    return rc;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s LIBLORAFUSE MODEL_DIR LORA_A LORA_B WEIGHT_B OUT_DIR\n", argv[0]);
        return 2;
    }
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 2; }
    LorafuseGetApiBaseFn entry;
    /* POSIX: converting the object pointer dlsym returns to a function pointer. */
    *(void **)(&entry) = dlsym(h, "lorafuse_get_api_base");
    if (!entry) { fprintf(stderr, "not a lorafuse plugin: %s\n", dlerror()); return 2; }
    const LorafuseApiBase *base = entry();
    api = base->get_api(LORAFUSE_API_VERSION);
    if (!api) {
        fprintf(stderr, "plugin %s lacks API v%u\n", base->get_version_string(), LORAFUSE_API_VERSION);
        return 2;
    }
    printf("lorafuse %s\n", base->get_version_string());
    if (failed(api->set_log_callback(on_log, NULL), "set_log_callback")) return 1;

    LorafusePipelineOptions opts = {.struct_version = LORAFUSE_PIPELINE_OPTIONS_VERSION};
    if (failed(api->init_pipeline_options(&opts), "init_pipeline_options")) return 1;
    opts.model_dir = argv[2];
    opts.device = LORAFUSE_DEVICE_CPU;
    opts.intra_threads = 1;
    LorafusePipeline *p = NULL;
    if (failed(api->create_pipeline(&opts, &p), "create_pipeline")) return 1;

    LorafuseLora *a = NULL, *b = NULL;
    if (failed(api->load_lora(argv[3], &a), "load_lora A")) return 1;
    if (failed(api->load_lora(argv[4], &b), "load_lora B")) return 1;

    const LorafuseLora *set[1] = {a};
    float weight = 1.0f;
    if (failed(api->set_loras(p, set, &weight, 1, NULL), "set_loras A")) return 1;
    if (generate_to(p, argv[6], "a")) return 1;

    /* Hot swap on the live pipeline. The pipeline keeps its own reference to b. */
    set[0] = b;
    weight = (float)atof(argv[5]);
    if (failed(api->set_loras(p, set, &weight, 1, NULL), "set_loras B")) return 1;
    api->release_lora(a);
    api->release_lora(b);
    if (generate_to(p, argv[6], "b")) return 1;

    LorafuseString *report = NULL;
    if (failed(api->lora_report(p, &report), "lora_report")) return 1;
    size_t len = 0;
    const char *json = api->string_data(report, &len);
    printf("report: %zu bytes, starts %.20s\n", len, json);
    api->release_string(report);

    api->release_pipeline(p);
    api->release_pipeline(p); /* a second release is ignored */
    api->release_pipeline(NULL);
    /* No dlclose: unloading the plugin is not supported. */
    return 0;
}
