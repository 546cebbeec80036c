"""Billing endpoints mapped onto local plans and quotas: nothing is charged on a self-hosted server.

The admin defines plans (monthly requests, queue limit, trained models included) with
`/api/v1/enterprise/plans` or `sdserve plans set`. `buy_subscription` makes a new key on a plan:
the admin may give any plan, other keys only plans the admin marked `self_service`.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from sdserve.api.deps import CallerDep
from sdserve.api.envelope import ok
from sdserve.api.openapi import answers, body, query
from sdserve.errors import InvalidKey, InvalidRequest, ValidationFailed
from sdserve.schemas import answers as wire
from sdserve.schemas.admin import (
    BuyModelRequest,
    BuySubscriptionRequest,
    CancelSubscriptionRequest,
    KeyOnly,
    PlansRequest,
)

router = APIRouter(tags=["plans"])


def _optional_int(body: dict, field: str, errors: dict) -> int | None:
    value = body.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = int(str(value).strip())
        if number < 0:
            raise ValueError
        return number
    except ValueError:
        errors[field] = [f"The {field} must be a whole number, 0 or more."]
        return None


@router.post(
    "/api/v3/buy_subscription",
    summary="Get a new key on a plan",
    responses=answers(wire.SubscriptionBought),
    openapi_extra=body(BuySubscriptionRequest),
)
async def buy_subscription(found: CallerDep):
    state, body, principal = found.state, found.body, found.principal
    name = str(body.get("plan_name") or "").strip()
    plans = {p["name"]: p for p in await run_in_threadpool(state.keys.plans)}
    if name not in plans:
        known = ", ".join(plans) or "none defined yet"
        raise ValidationFailed({"plan_name": [f"The plan_name must be one of: {known}."]})
    if not principal.is_admin and not plans[name]["self_service"]:
        raise InvalidRequest("This plan is given by the server operator only")
    key = await run_in_threadpool(state.keys.subscribe, name, principal.key_id)
    tier = name.split("_")[0]
    return ok(
        f"You have just bought a custom api with {tier} plan", data={"key": key, "plan": name}
    )


@router.post(
    "/api/v3/cancel_subscription",
    summary="Revoke a key bought on a plan",
    responses=answers(wire.MessageAnswer),
    openapi_extra=body(CancelSubscriptionRequest),
)
async def cancel_subscription(found: CallerDep):
    state, body, principal = found.state, found.body, found.principal
    target = str(body.get("key_to_cancel") or "").strip()
    if not target:
        raise ValidationFailed({"key_to_cancel": ["The key to cancel field is required."]})
    if not await run_in_threadpool(state.keys.cancel, target, principal):
        raise InvalidRequest("Invalid key_to_cancel: no such active key of yours")
    return ok("subscription cancelled successfully")


@router.post(
    "/api/v3/dreambooth/buy_model",
    summary="Add trainings to a key's allowance",
    responses=answers(wire.ModelsBought),
    openapi_extra=body(BuyModelRequest),
)
async def buy_model(found: CallerDep):
    """More trained models for the key: for self-service plans, or any key given by the admin."""
    state, body, principal = found.state, found.body, found.principal
    errors: dict[str, list[str]] = {}
    quantity = _optional_int(body, "quantity", errors)
    if not errors and not quantity:
        errors["quantity"] = ["The quantity must be 1 or more."]
    if errors:
        raise ValidationFailed(errors)
    if principal.is_admin or principal.key_id is None:
        raise InvalidRequest("The admin key has no model limit; buy models with a user's key")
    plan = await run_in_threadpool(state.keys.plan, principal.plan) if principal.plan else None
    if plan is None or not plan["self_service"]:
        raise InvalidRequest("Extra models are given by the server operator only")
    purchased = await run_in_threadpool(state.keys.add_purchased_models, principal.key_id, quantity)
    used = len(await run_in_threadpool(state.store.list_trainings, principal.owner))
    available = plan["included_models"] + purchased - used
    return ok(
        "Payment was charged successfuly",  # sic: the hosted wording; nothing is charged here
        purchased_models=purchased,
        used_models=used,
        available_models=max(available, 0),
    )


@router.get(
    "/api/subscribed_products",
    summary="A key's plan and monthly usage",
    responses=answers(wire.SubscribedProducts),
    openapi_extra=query(KeyOnly),
)
@router.post(
    "/api/subscribed_products",
    summary="A key's plan and monthly usage",
    responses=answers(wire.SubscribedProducts),
    openapi_extra=body(KeyOnly),
)
async def subscribed_products(found: CallerDep):
    state, _body, principal = found.state, found.body, found.principal
    used = await run_in_threadpool(state.store.usage, principal.key_id) if principal.key_id else 0
    quota = principal.monthly_quota
    product = {
        "plan": principal.plan,
        "total_api_call": quota,
        "api_call_used": used,
        "api_call_remaining": None if quota is None else max(quota - used, 0),
        "percentage_used": 0 if not quota else min(100, round(100 * used / quota)),
    }
    return {"status": "success", "data": {"imagen": product}}


@router.post(
    "/api/v1/enterprise/plans",
    tags=["enterprise"],
    summary="List, create or change plans",
    responses=answers(wire.Plans),
    openapi_extra=body(PlansRequest),
)
async def plans(found: CallerDep):
    """List the plans; with `plan_name`, create or change that plan first."""
    state, body, principal = found.state, found.body, found.principal
    if not principal.is_admin:
        raise InvalidKey()
    name = str(body.get("plan_name") or "").strip()
    if name:
        errors: dict[str, list[str]] = {}
        fields = {
            f: _optional_int(body, f, errors)
            for f in ("requests_per_month", "queue_limit", "included_models")
        }
        if errors:
            raise ValidationFailed(errors)
        self_service = str(body.get("self_service", "")).strip().lower() in ("yes", "true", "1")
        await run_in_threadpool(
            state.keys.set_plan,
            name,
            fields["requests_per_month"],
            fields["queue_limit"],
            fields["included_models"] or 0,
            self_service,
        )
    return {"status": "success", "plans": await run_in_threadpool(state.keys.plans)}
