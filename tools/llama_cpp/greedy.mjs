// llama.cpp's greedy tokens for token-id prompts, through its prebuilt Node binding (node-llama-cpp, CPU build).
//   node greedy.mjs '{"model": "model.gguf", "prompts": [[1, 2, 3]], "max_tokens": 16}'   ->  {"tokens": [[...]], "meta": {...}}
// Used by tools/bench_gguf_llama_cpp.py and tests/test_llama_cpp_client.py: the tokens llama.cpp decodes from forge's GGUF
// files, compared there with transformers' on the same weights.
import {getLlama} from "node-llama-cpp";

const spec = JSON.parse(process.argv[2]);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: spec.model});
const out = [];
for (const prompt of spec.prompts) {
    const context = await model.createContext({contextSize: Math.max(256, prompt.length + spec.max_tokens + 8)});
    const sequence = context.getSequence();
    const tokens = [];
    for await (const token of sequence.evaluate(prompt, {temperature: 0})) {
        tokens.push(token);
        if (tokens.length >= spec.max_tokens || model.isEogToken(token)) break;
    }
    out.push(tokens);
    await context.dispose();
}
console.log(JSON.stringify({tokens: out}));
await model.dispose();
await llama.dispose();
