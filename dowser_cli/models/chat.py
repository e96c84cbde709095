"""The chat text dowser gives models that ship no chat template (base checkpoints, the tiny builds)."""

IMAGE_PLACEHOLDER = "<image>"
# Models without a chat template (base checkpoints) get LLaVA-1.5's plain conversation format.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}ASSISTANT: {{ m['content'] }}"
    "{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# The same text for messages whose content is a list of typed parts ({"type": "image"} / {"type": "text"}),
# as processors' templates take them: what a checkpoint without a chat template gets when it is handed
# to another harness (lmms-eval), so both render one prompt.
FALLBACK_LIST_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}\n"
    "{% elif m['role'] == 'user' %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def accepting_parts(template: str, image_token: str = IMAGE_PLACEHOLDER) -> str:
    """A chat template that takes a string per message (SmolLM2's ChatML) made to take typed parts as
    well, as lmms-eval's chat wrappers hand them: each message's parts are joined into one string
    first (an image part becomes ``image_token`` and a new line, where dowser's own prompts put the
    image), then ``template`` renders as before."""
    return ("{%- set ns = namespace(msgs=[]) -%}{%- for m in messages -%}"
            "{%- if m['content'] is string -%}{%- set ns.msgs = ns.msgs + [m] -%}"
            "{%- else -%}{%- set part = namespace(text='') -%}{%- for c in m['content'] -%}"
            "{%- if c['type'] == 'image' -%}{%- set part.text = part.text + " + repr(image_token) + " + '\\n' -%}"
            "{%- elif c['type'] == 'text' -%}{%- set part.text = part.text + c['text'] -%}{%- endif -%}"
            "{%- endfor -%}{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': part.text}] -%}"
            "{%- endif -%}{%- endfor -%}{%- set messages = ns.msgs %}" + template)
