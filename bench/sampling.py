"""One-step student vs multi-step teacher throughput, measured side by side in one run.

    python bench/sampling.py                                    # shipped digits teacher, student = quickstart's
    python bench/sampling.py --student runs/quickstart/pipeline --batch 256 --teacher-steps 50

Throughput does not depend on how well the student is trained, so without a student folder the student is the
teacher's own network used as a one-step generator (same architecture, same cost).
"""
import argparse
import json

import torch

from onestep.denoisers import load_teacher
from onestep.eval.speed import images_per_second
from onestep.generators import OneStepGenerator
from onestep.pipelines import OneStepPipeline, load_pipeline
from onestep.resources import DIGITS_TEACHER
from onestep.sampling.samplers import sample_euler, teacher_sigmas


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(DIGITS_TEACHER))
    parser.add_argument("--student", default=None, help="exported pipeline folder, any registered class (optional)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    teacher = load_teacher(args.teacher).to(args.device, dtype)
    if args.student:
        student = load_pipeline(args.student, torch_dtype=dtype).to(args.device)
    else:
        student = OneStepPipeline.from_generator(OneStepGenerator(teacher, 2.5), teacher.scheduler)
    noise = torch.randn((args.batch, *student.noise_shape), device=args.device)
    labels = torch.arange(args.batch) % student.num_classes if student.num_classes else None
    cond = {"class_labels": torch.arange(args.batch, device=args.device) % teacher.num_classes} \
        if teacher.num_classes else {}
    nfe = student.default_inference_steps
    sigmas = teacher_sigmas(teacher.schedule, args.teacher_steps)
    with torch.inference_mode():
        student_ips = images_per_second(lambda: student.generate(noise, nfe, class_labels=labels), args.batch,
                                        args.repeats)
        teacher_ips = images_per_second(lambda: sample_euler(teacher, noise, sigmas, **cond), args.batch,
                                        max(1, args.repeats // 3))
    print(json.dumps({"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}",
                      "dtype": args.dtype, "batch": args.batch, "student_nfe": nfe, "teacher_nfe": args.teacher_steps,
                      "student_images_per_s": round(student_ips, 1), "teacher_images_per_s": round(teacher_ips, 2),
                      "speedup": round(student_ips / teacher_ips, 1)}))


if __name__ == "__main__":
    main()
